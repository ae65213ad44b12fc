"""Fake nodes for the local control plane: GPU profiles, pool parsing, Node objects (pure).

kwok manages only nodes annotated `kwok.x-k8s.io/node: fake`. GPU nodes carry the labels the
NVIDIA GPU feature discovery sets (`nvidia.com/gpu.product`, `.memory`, `.compute.major/minor`,
`.count`, `.present`), `nvidia.com/gpu` capacity, and the taint `nvidia.com/gpu=present:NoSchedule`
(GPU workloads tolerate it, everything else stays off GPU nodes).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_SELECTOR = f"{KWOK_ANNOTATION}=fake"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
# With the real node, the kwok CPU node is tainted: CPU pods land on the real node unless a test
# asks for a fake pod on purpose (`on_fake_cpu_node`), e.g. to reconcile hundreds of CRs.
FAKE_CPU_TAINT = {"key": "diffusion.dev/fake-node", "value": "true", "effect": "NoSchedule"}
PROFILE_LABEL = "diffusion.dev/node-profile"


@dataclass(frozen=True)
class Profile:
    name: str
    gpu_product: str | None = None
    gpu_memory_mib: int = 0
    compute: tuple[int, int] = (0, 0)
    gpus: int = 0
    cpu: str = "32"
    memory: str = "256Gi"


PROFILES = {
    "h100": Profile("h100", "NVIDIA-H100-80GB-HBM3", 81559, (9, 0), 8, "192", "2Ti"),
    "a100": Profile("a100", "NVIDIA-A100-SXM4-80GB", 81920, (8, 0), 8, "128", "1Ti"),
    "l4": Profile("l4", "NVIDIA-L4", 23034, (8, 9), 4, "48", "192Gi"),
    "cpu": Profile("cpu", None, cpu="32", memory="128Gi"),
}

DEFAULT_POOL = "h100=2,a100=1,cpu=1"
# With the real node the same pool, its CPU node tainted (FAKE_CPU_TAINT): CPU pods land on the
# real node.
REAL_NODE_POOL = DEFAULT_POOL


@dataclass(frozen=True)
class NodeSpec:
    name: str
    profile: Profile


def parse_pool(text: str) -> list[NodeSpec]:
    """`h100=2,a100=1,cpu=1` -> node specs named `kwok-h100-0`, `kwok-h100-1`, ...

    Counts are 0..64; unknown profiles or malformed entries raise ValueError naming them.
    """
    nodes: list[NodeSpec] = []
    seen: set[str] = set()
    if not text.strip():
        raise ValueError("empty node pool: expected e.g. " + DEFAULT_POOL)
    for item in text.split(","):
        m = re.fullmatch(r"\s*([a-z0-9]+)\s*(?:=\s*(\d+))?\s*", item)
        if not m:
            raise ValueError(f"bad node pool entry {item!r}: expected <profile>=<count>, e.g. {DEFAULT_POOL}")
        name, count = m.group(1), int(m.group(2) or 1)
        if name not in PROFILES:
            raise ValueError(f"unknown node profile {name!r}: choose from {', '.join(sorted(PROFILES))}")
        if name in seen:
            raise ValueError(f"node profile {name!r} given twice")
        if count > 64:
            raise ValueError(f"{count} {name} nodes is more than 64")
        seen.add(name)
        nodes += [NodeSpec(f"kwok-{name}-{i}", PROFILES[name]) for i in range(count)]
    if not nodes:
        raise ValueError("the node pool has no nodes")
    return nodes


def node_object(spec: NodeSpec, taint_cpu: bool = False) -> dict:
    """The Node for `spec`; `taint_cpu` taints a CPU-only node with FAKE_CPU_TAINT."""
    p = spec.profile
    labels = {
        "kubernetes.io/hostname": spec.name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "type": "kwok",
        PROFILE_LABEL: p.name,
    }
    capacity = {"cpu": p.cpu, "memory": p.memory, "pods": "110", "ephemeral-storage": "1Ti"}
    taints = []
    if p.gpus:
        labels |= {
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": p.gpu_product or "",
            "nvidia.com/gpu.memory": str(p.gpu_memory_mib),
            "nvidia.com/gpu.count": str(p.gpus),
            "nvidia.com/gpu.compute.major": str(p.compute[0]),
            "nvidia.com/gpu.compute.minor": str(p.compute[1]),
        }
        capacity[GPU_RESOURCE] = str(p.gpus)
        taints.append(dict(GPU_TAINT))
    elif taint_cpu:
        taints.append(dict(FAKE_CPU_TAINT))
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": spec.name,
            "labels": labels,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
        },
        "spec": {"taints": taints} if taints else {},
        "status": {"capacity": capacity, "allocatable": dict(capacity)},
    }


def fake_cpu_placement() -> dict:
    """Pod spec fields that put a pod on the kwok CPU node (tolerating its taint)."""
    toleration = {"key": FAKE_CPU_TAINT["key"], "operator": "Equal", "value": FAKE_CPU_TAINT["value"],
                  "effect": FAKE_CPU_TAINT["effect"]}  # fmt: skip
    return {"nodeSelector": {PROFILE_LABEL: "cpu"}, "tolerations": [toleration]}


def on_fake_cpu_node(doc: dict) -> dict:
    """A DiffusionDeployment (CPU) pinned to the kwok CPU node: its pods are fake (kwok), on
    purpose. Returns a copy with `spec.template.nodeSelector` and the toleration set."""
    out = json.loads(json.dumps(doc))
    template = out["spec"].setdefault("template", {})
    placement = fake_cpu_placement()
    template["nodeSelector"] = {**template.get("nodeSelector", {}), **placement["nodeSelector"]}
    template["tolerations"] = [*template.get("tolerations", []), *placement["tolerations"]]
    return out
