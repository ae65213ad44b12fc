"""Pure parts of the dev cluster: node pools, Node objects, the generated replace list."""

from __future__ import annotations

import pytest
from diffusion_operator.devcluster import DEFAULT_POOL, node_object, parse_pool
from diffusion_operator.devcluster.build import (
    MODULES,
    BuildError,
    current_replaces,
    generated_replaces,
    ldflags,
    read_gomod,
    staging_version,
    sync_k8s_replaces,
    tools_dir,
)


def test_default_pool_is_two_h100_one_a100_one_cpu():
    nodes = parse_pool(DEFAULT_POOL)
    assert [n.name for n in nodes] == ["kwok-h100-0", "kwok-h100-1", "kwok-a100-0", "kwok-cpu-0"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("h100=2,tpu=1", "unknown node profile 'tpu'"),
        ("h100=x", "bad node pool entry"),
        ("h100=1,h100=2", "given twice"),
        ("", "empty node pool"),
        ("cpu=0", "no nodes"),
        ("cpu=65", "more than 64"),
    ],
)
def test_bad_pools_are_refused_clearly(text, message):
    with pytest.raises(ValueError, match=message):
        parse_pool(text)


def test_gpu_node_object_carries_gfd_labels_capacity_taint_and_kwok_annotation():
    node = node_object(parse_pool("h100=1")[0])
    labels = node["metadata"]["labels"]
    assert labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert labels["nvidia.com/gpu.memory"] == "81559"
    assert (labels["nvidia.com/gpu.compute.major"], labels["nvidia.com/gpu.compute.minor"]) == ("9", "0")
    assert labels["nvidia.com/gpu.present"] == "true"
    assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"
    assert node["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert node["spec"]["taints"] == [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]
    a100 = node_object(parse_pool("a100=1")[0])["metadata"]["labels"]
    assert (a100["nvidia.com/gpu.compute.major"], a100["nvidia.com/gpu.compute.minor"]) == ("8", "0")
    cpu = node_object(parse_pool("cpu=1")[0])
    assert "nvidia.com/gpu" not in cpu["status"]["capacity"] and not cpu["spec"].get("taints")
    assert not any(k.startswith("nvidia.com/") for k in cpu["metadata"]["labels"])


def test_staging_version_maps_v1_to_v0():
    assert staging_version("v1.37.2") == "v0.37.2"
    assert staging_version("v1.36.0-rc.1") == "v0.36.0-rc.1"
    with pytest.raises(BuildError):
        staging_version("v2.0.0")


def test_generated_replaces_turn_staging_paths_into_module_versions():
    upstream = {
        "Replace": [
            {"Old": {"Path": "k8s.io/api"}, "New": {"Path": "./staging/src/k8s.io/api"}},
            {"Old": {"Path": "k8s.io/client-go"}, "New": {"Path": "./staging/src/k8s.io/client-go"}},
            {"Old": {"Path": "example.com/x"}, "New": {"Path": "example.com/fork", "Version": "v1.2.3"}},
        ]
    }
    assert generated_replaces(upstream, "v1.37.2") == {
        "k8s.io/api": "k8s.io/api@v0.37.2",
        "k8s.io/client-go": "k8s.io/client-go@v0.37.2",
        "example.com/x": "example.com/fork@v1.2.3",
    }
    with pytest.raises(BuildError, match="local replace"):
        generated_replaces({"Replace": [{"Old": {"Path": "a"}, "New": {"Path": "../a"}}]}, "v1.37.2")


def test_committed_k8s_replaces_match_kubernetes_own_go_mod():
    """Regenerates the list from k8s.io/kubernetes's go.mod (Go module proxy) and compares."""
    module_dir = tools_dir() / "k8s"
    version, generated = sync_k8s_replaces(module_dir, write=False)  # raises if they differ
    assert version == "v1.37.2"
    assert current_replaces(read_gomod(module_dir)) == generated
    assert len(generated) >= 30 and generated["k8s.io/apiserver"] == "k8s.io/apiserver@v0.37.2"


def test_k8s_ldflags_set_the_release_version():
    flags = ldflags(MODULES[0], "v1.37.2", "2026-10-27T12:01:04Z")
    assert "-X k8s.io/component-base/version.gitVersion=v1.37.2" in flags
    assert "-X k8s.io/component-base/version.gitMinor=37" in flags


def _fake_assets(directory, names):
    directory.mkdir()
    for name in names:
        exe = directory / name
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
    return directory


def test_assets_env_points_at_prebuilt_binaries(tmp_path, monkeypatch):
    from diffusion_operator.devcluster.build import CONTROL_PLANE, assets_override, ensure_binaries

    full = _fake_assets(tmp_path / "full", CONTROL_PLANE)
    envtest = _fake_assets(tmp_path / "envtest", ("etcd", "kube-apiserver", "kubectl"))
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    monkeypatch.setenv("DIFFUSION_OPERATOR_ASSETS", str(full))
    assert ensure_binaries() == full  # nothing is built or looked up
    monkeypatch.setenv("DIFFUSION_OPERATOR_ASSETS", str(envtest))
    with pytest.raises(BuildError, match="lacks executable.*kube-controller-manager"):
        assets_override()
    monkeypatch.delenv("DIFFUSION_OPERATOR_ASSETS")
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(full))
    assert assets_override() == full
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(envtest))  # envtest's usual set: not enough, ignored
    assert assets_override() is None


def test_sync_modules_detects_and_regenerates_a_damaged_replace_list(tmp_path):
    import shutil
    import subprocess

    module = tmp_path / "k8s"
    shutil.copytree(tools_dir() / "k8s", module)
    subprocess.run(["go", "mod", "edit", "-dropreplace=k8s.io/api", "-replace=k8s.io/kubelet=k8s.io/kubelet@v0.36.0"],
                   cwd=module, check=True)  # fmt: skip
    with pytest.raises(BuildError, match=r"missing \['k8s.io/api'\].*changed \['k8s.io/kubelet'\]"):
        sync_k8s_replaces(module, write=False)
    sync_k8s_replaces(module, write=True)
    assert current_replaces(read_gomod(module)) == current_replaces(read_gomod(tools_dir() / "k8s"))
