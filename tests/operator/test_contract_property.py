"""Property: nothing reported valid that a pod refuses; every refusal names a CR field.

Hypothesis draws CR specs from the committed CRD's own schema (types, bounds, enums, patterns, item
limits of every field, cache-dit's generated parts included; the CRD's CEL rules are applied to the
drawn spec). For each, the operator's `parse` either reports it valid, and then the runtime.yaml and
cache-dit.yaml it renders pass the runtime's own loading and preflight (load_config_file, validate,
plan_cache_dit on the pod's device) and cache-dit's own `load_configs`; or it refuses it, and then
every error names a field path of the CR schema (`spec.` ...).
"""

from __future__ import annotations

import copy
import re

import yaml
from diffusion_operator import builders, validation
from diffusion_operator.api import funcs, types
from diffusion_operator.api.model_facts import KNOWN_MODELS, product_capability
from diffusion_runtime.contract import cache_dit_facts as facts
from diffusion_runtime.contract.config import load_config_file, runtime_errors, validate
from diffusion_runtime.engine.optimize import plan_cache_dit, read_cache_dit_yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from op_helpers import OWNER, REPO

CRD = yaml.safe_load((REPO / "crds" / "diffusion.dev_diffusiondeployments.yaml").read_text())
SPEC_SCHEMA = CRD["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
EXAMPLES = 1000

# a few values worth drawing more often than a regex would (all valid by the schema)
URIS = [
    "hf://black-forest-labs/FLUX.1-dev",
    "hf://Qwen/Qwen-Image",
    "file:///models/tiny-flux",
    "pvc://models/flux",
]
URIS += [f"hf://org/{name}" for name in sorted(KNOWN_MODELS)]
SIZES = [f"{w}x{h}" for w in (64, 512, 1000, 1024, 1328, 2048, 4096) for h in (64, 768, 1024, 1000)]
PRODUCTS = [
    "NVIDIA-H100-80GB-HBM3",
    "NVIDIA-A100-SXM4-80GB",
    "NVIDIA-L4",
    "NVIDIA-B200",
    "Tesla-T4",
    "Mystery",
]
TEXT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_.", min_size=1, max_size=12)


def _integer(node: dict) -> st.SearchStrategy:
    lo = node.get("minimum", -5)
    hi = node.get("maximum", lo + 5000)
    small = st.integers(lo, min(hi, lo + 70))
    return st.one_of(small, small, st.integers(lo, hi))


def _string(node: dict, path: str) -> st.SearchStrategy:
    if "enum" in node:
        return st.sampled_from(node["enum"])
    max_len = node.get("maxLength", 40)
    if path == ".model.uri":
        return st.one_of(st.sampled_from(URIS), st.from_regex(node["pattern"], fullmatch=True)).filter(
            lambda s: len(s) <= max_len
        )
    if path == ".gpu.product":
        return st.sampled_from(PRODUCTS)
    if path == ".warmup.resolutions[]":
        return st.one_of(st.sampled_from(SIZES), st.from_regex(node["pattern"], fullmatch=True))
    if "pattern" in node:
        return st.from_regex(node["pattern"], fullmatch=True).filter(lambda s: len(s) <= max_len)
    return TEXT.filter(lambda s: len(s) <= max_len)


def strategy(node: dict, path: str = "") -> st.SearchStrategy:
    """Values valid by one node of the CRD's structural schema."""
    if path.endswith(".steps_computation_mask"):
        names = st.sampled_from([*facts.MASK_POLICIES, "fastest"])
        return st.one_of(names, st.lists(st.sampled_from([0, 1]), min_size=0, max_size=60))
    if path in (".template.affinity", ".queue.frontDoor.affinity"):
        return st.just({"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}})
    if node.get("x-kubernetes-int-or-string"):
        if "pattern" in node:  # a quantity
            return st.one_of(
                st.integers(0, 10**6), st.sampled_from(["1", "500m", "1Gi", "64Gi", "0.5", "1e3"])
            )
        return st.one_of(st.integers(0, 3), st.sampled_from(["0", "1", "0%", "25%", "100%"]))
    kind = node.get("type")
    if kind == "integer":
        return st.sampled_from(node["enum"]) if "enum" in node else _integer(node)
    if kind == "number":
        lo = node.get("minimum", -1.0)
        return st.floats(lo, node.get("maximum", lo + 10.0), allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "string":
        return _string(node, path)
    if kind == "array":
        return st.lists(strategy(node["items"], path + "[]"), max_size=min(node.get("maxItems", 3), 3))
    if kind == "object" and "properties" in node:
        props = node["properties"]
        required = set(node.get("required", []))
        return st.fixed_dictionaries(
            {k: strategy(v, f"{path}.{k}") for k, v in props.items() if k in required},
            optional={k: strategy(v, f"{path}.{k}") for k, v in props.items() if k not in required},
        )
    if kind == "object" and isinstance(node.get("additionalProperties"), dict):
        return st.dictionaries(TEXT, strategy(node["additionalProperties"], path + "{}"), max_size=2)
    raise AssertionError(f"no strategy for {path}: {node}")


def apply_cel(spec: dict) -> dict:
    """The CRD's x-kubernetes-validations, applied as the API server would refuse (we repair instead)."""
    spec = copy.deepcopy(spec)
    if "replicas" in spec and "autoscaling" in spec:
        del spec["replicas"]
    auto = spec.get("autoscaling")
    if auto and auto.get("minReplicas", 1) > auto["maxReplicas"]:
        auto["minReplicas"] = auto["maxReplicas"]
    if auto and auto.get("minReplicas", 1) == 0 and "queue" not in spec:  # scale to zero needs a queue
        auto["minReplicas"] = 1
    rollout = spec.get("rollout") or {}
    if str(rollout.get("maxSurge", 0)) in ("0", "0%") and str(rollout.get("maxUnavailable", 1)) in (
        "0",
        "0%",
    ):
        rollout["maxUnavailable"] = 1
    cache = (spec.get("cacheDit") or {}).get("cache_config") or {}
    flags = [k for k in ("enable_taylorseer", "enable_dmd", "enable_foca") if cache.get(k)]
    for k in flags[1:]:
        cache[k] = False
    par = (spec.get("cacheDit") or {}).get("parallelism_config")
    if par is not None:
        product = 1
        for k in facts.PARALLEL_SIZE_KEYS:
            product *= par.get(k, 1)
        spec.setdefault("gpu", {})
        on_gpus = funcs.ranks_device(spec.get("device", "auto"), spec["gpu"].get("count", 1)) == "cuda"
        if product > types.MAX_RANKS:
            spec["cacheDit"].pop("parallelism_config")
        else:  # one rank per GPU, or CPU ranks in a pod without GPUs
            spec["gpu"] = {**spec["gpu"], "count": product if on_gpus else 0}
    env = (spec.get("template") or {}).get("env")
    if env:
        spec["template"]["env"] = [
            e for e in env if e["name"] not in ("HF_TOKEN", "DIFFUSION_WEBHOOK_SECRET", "DIFFUSION_QUEUE_URL")
        ]
    return spec


def names_a_cr_field(path: str) -> bool:
    """`spec.a.b[0].c[key]` exists in the CRD's spec schema: `.name` a property, `[...]` a list item
    or a map key."""
    if not re.fullmatch(r"spec(\.[A-Za-z_][\w-]*|\[[^\]]+\])*", path):
        return False
    node = SPEC_SCHEMA
    for part in re.findall(r"\.([A-Za-z_][\w-]*)|\[[^\]]+\]", path[len("spec") :]):
        if node.get("x-kubernetes-preserve-unknown-fields"):
            return True  # free-form below here (template.affinity, steps_computation_mask)
        if not part:  # a list index or a map key
            if isinstance(node.get("items"), dict):
                node = node["items"]
            elif isinstance(node.get("additionalProperties"), dict):
                node = node["additionalProperties"]
            else:
                return False
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return False
    return True


def runtime_accepts(parsed: validation.Parsed, tmp_path, load_configs) -> None:
    """The pod's own steps on the rendered files: load, validate, preflight the cache-dit YAML, and
    cache-dit's own loader on what the runtime hands it."""
    cr = parsed.cr
    assert cr is not None
    s, on = cr.spec, funcs.device_type(cr.spec)
    cm = builders.build_configmap(cr, OWNER)
    for key, text in cm["data"].items():
        (tmp_path / key).write_text(text)
    cfg = validate(load_config_file(tmp_path / "runtime.yaml"))
    assert cfg.server.max_n == s.server.max_n and cfg.warmup.steps == s.warmup.steps
    capability = product_capability(s.gpu.product) if s.gpu.product and on == "cuda" else None
    raw = read_cache_dit_yaml(cfg.cache_dit_config) if cfg.cache_dit_config else None
    # serve's preflight on the pod's device
    assert runtime_errors(cfg, raw, on, capability) == []
    if raw is not None:
        plan = plan_cache_dit(raw, on, capability)
        if plan.uses_cache_dit:
            loaded = load_configs(copy.deepcopy(plan.raw))
            if "cache_config" in plan.raw:
                assert loaded["cache_config"].strify() == funcs.cache_tag(funcs.cache_dit_config(s))


def test_every_valid_spec_runs_and_every_refusal_names_a_cr_field(tmp_path, load_configs):
    seen = {"valid": 0, "refused": 0, "unsupported": 0}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(strategy(SPEC_SCHEMA).map(apply_cel))
    def check(spec: dict) -> None:
        parsed = validation.parse("x", "ns", spec)
        if parsed.ok:
            seen["valid"] += 1
            runtime_accepts(parsed, tmp_path, load_configs)
            return
        seen["unsupported" if parsed.reason == "Unsupported" else "refused"] += 1
        assert parsed.errors
        for error in parsed.errors:
            assert names_a_cr_field(error.field), (error.field, str(error), spec)
            assert error.message and "\n" not in error.message

    check()
    print(f"property: {seen}")
    total = sum(seen.values())
    assert total >= EXAMPLES, seen
    # both sides of the property were exercised, not one
    assert seen["valid"] >= total // 10 and seen["refused"] >= total // 10, seen


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**12), 10**12) | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
    max_leaves=8,
)


def _mutations(spec: dict) -> st.SearchStrategy:
    """A schema-valid spec with one node replaced by arbitrary JSON (wrong types, huge values)."""
    paths: list[tuple] = []

    def walk(node, path):
        paths.append(path)
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))

    walk(spec, ())
    return st.tuples(st.sampled_from(paths), JSON | st.sampled_from([10**18, -1, "", "fast", [], {}]))


def _replace(spec: dict, path: tuple, value) -> dict:
    if not path:
        return value
    out = copy.deepcopy(spec)
    node = out
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return out


def test_parse_never_raises_on_broken_specs():
    """Wrong types, out-of-range and huge values anywhere (a CR the schema did not check): an error
    naming a CR field, never an exception, never a hang (a named mask with 10**18 steps is refused
    before cache-dit's table would expand it)."""
    counts = {"refused": 0, "valid": 0}

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy(SPEC_SCHEMA).map(apply_cel).flatmap(lambda s: st.tuples(st.just(s), _mutations(s))))
    # found by a random seed: a quantize key that is not a plain name ("0") on a CPU pod was reported
    # at `spec.quantize.0`, not a field path (the runtime's CPU check wrote `quantize_config.{key}`)
    @example(({"model": {"uri": "hf://Qwen/Qwen-Image"}, "device": "cpu"}, (("quantize",), {"0": 1})))
    def check(drawn) -> None:
        spec, (path, value) = drawn
        broken = _replace(spec, path, value)
        parsed = validation.parse("x", "ns", broken)
        counts["valid" if parsed.ok else "refused"] += 1
        for error in parsed.errors:
            field = error.field
            if error.message.startswith("unknown"):  # a key the CR does not have, under one it has
                field = re.sub(r"(\.[^.\[\]]+|\[[^\]]+\])$", "", field)
            assert field == "spec" or names_a_cr_field(field), (error.field, str(error), broken)
        if parsed.ok:
            funcs.cache_tag(funcs.cache_dit_config(parsed.cr.spec))
            builders.build_all(parsed.cr, OWNER)

    check()
    print(f"broken specs: {counts}")
    assert counts["refused"] >= EXAMPLES // 3, counts
