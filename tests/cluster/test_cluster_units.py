"""Pure parts of the dev cluster: node pools, Node objects, the generated replace list."""

from __future__ import annotations

import subprocess

import pytest
from diffusion_dev import DEFAULT_POOL, node_object, parse_pool, wait_for
from diffusion_dev.build import (
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
    from diffusion_dev.build import CONTROL_PLANE, assets_override, ensure_binaries

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


# ---------------------------------------------------------------- the real node (pure parts)


def test_iptables_rules_are_compared_without_counters_and_empty_tables_read_as_absent():
    from diffusion_dev.hoststate import normalise_rules

    empty = "# Generated\n*nat\n:PREROUTING ACCEPT [3:180]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n"
    assert normalise_rules(empty) == ""
    kube = (
        "*filter\n:INPUT ACCEPT [10:20]\n:KUBE-FIREWALL - [0:0]\n[5:300] -A INPUT -j KUBE-FIREWALL\nCOMMIT\n"
    )
    assert (
        normalise_rules(kube) == "*filter\n:INPUT ACCEPT\n:KUBE-FIREWALL -\n-A INPUT -j KUBE-FIREWALL\nCOMMIT"
    )


def test_host_state_diff_names_every_kind_of_change():
    from diffusion_dev.hoststate import Snapshot, diff

    before = Snapshot(
        sysctls={"kernel/panic": "1"}, links=["eth0"], cgroups=["cpu:a"], paths={"/var/lib/kubelet": False}
    )
    after = Snapshot(
        sysctls={"kernel/panic": "10"},
        iptables={"ipv4 filter": ":KUBE-FIREWALL -"},
        links=["eth0", "ddev0"],
        netns=["cni-1"],
        mounts=["/x"],
        cgroups=["cpu:a", "cpu:diffusion-dev"],
        processes=["kubelet"],
        paths={"/var/lib/kubelet": True},
    )
    text = "\n".join(diff(before, after))
    for needle in ("kernel/panic: 1 -> 10", "iptables ipv4 filter", "ddev0", "cni-1", "mounts added", "cpu:diffusion-dev",
                   "processes", "/var/lib/kubelet"):  # fmt: skip
        assert needle in text, (needle, text)
    assert diff(after, after) == []


def test_pods_get_no_default_route_no_masquerade_and_the_kubelet_fits_these_vms(tmp_path):
    from diffusion_dev import real_node as n

    cni = n.cni_config(tmp_path, "10.0.0.0/24")["plugins"][0]
    assert cni["ipMasq"] is False and cni["isGateway"] is False
    assert cni["ipam"]["routes"] == [{"dst": "10.0.0.0/24", "gw": n.NODE_IP}]  # the Service range only
    certs = n.NodeCerts(*[n.pki_client(tmp_path / x) for x in ("a", "b", "c", "d")])
    cfg = n.kubelet_config(certs, tmp_path / "ca", tmp_path / "sock", 1, 2, tmp_path / "logs", tmp_path / "r")
    assert (cfg["failCgroupV1"], cfg["cgroupDriver"], cfg["failSwapOn"]) == (False, "cgroupfs", False)
    assert (
        cfg["authentication"]["anonymous"]["enabled"] is False and cfg["authorization"]["mode"] == "Webhook"
    )
    toml = n.containerd_config(tmp_path, tmp_path, tmp_path / "s", tmp_path, "p", tmp_path)
    assert "restrict_oom_score_adj = true" in toml and "SystemdCgroup = false" in toml
    proxy = n.kube_proxy_config(tmp_path / "kc", 1, 2)
    assert proxy["nodePortAddresses"] == [n.POD_SUBNET] and proxy["iptables"]["localhostNodePorts"] is False


def test_pause_image_archive_is_one_layer_with_the_binary(tmp_path):
    import json
    import tarfile

    from diffusion_dev.real_node import pause_archive

    binary = tmp_path / "pause"
    binary.write_bytes(b"\x7fELF fake")
    pause_archive(binary, "localhost/diffusion-dev/pause:x", tmp_path / "a.tar")
    with tarfile.open(tmp_path / "a.tar") as tar:
        (manifest,) = json.load(tar.extractfile("manifest.json"))
        assert manifest["RepoTags"] == ["localhost/diffusion-dev/pause:x"] and len(manifest["Layers"]) == 1
        with tarfile.open(fileobj=tar.extractfile(manifest["Layers"][0])) as layer:
            assert layer.extractfile("pause").read() == b"\x7fELF fake"


def test_image_context_follows_dockerignore():
    from diffusion_dev.build import repo_root
    from diffusion_dev.images import context_files, ignored

    files = context_files(repo_root())
    assert "pyproject.toml" in files and "operator/diffusion_operator/cli.py" in files
    assert not [f for f in files if f.startswith(("tests/", "dev/", ".venv/")) or "__pycache__" in f]
    patterns = ["**", "!operator/", "**/__pycache__/"]
    assert not ignored("operator/x.py", patterns) and ignored("tests/operator/x.py", patterns)
    assert ignored("operator/a/__pycache__/x.pyc", patterns)


def test_wait_for_retries_not_yet_errors_and_names_the_last_one():
    calls = iter([KeyError("status"), subprocess.CalledProcessError(1, ["kubectl"]), None, "ready"])

    def condition():
        step = next(calls)
        if isinstance(step, Exception):
            raise step
        return step

    assert wait_for(condition, 5, "x", interval=0) == "ready"
    with pytest.raises(TimeoutError, match=r"waiting for y \(last error: ConnectionRefusedError: refused\)"):
        wait_for(lambda: (_ for _ in ()).throw(ConnectionRefusedError("refused")), 0.05, "y", interval=0.01)


@pytest.mark.parametrize("error", [AssertionError("wrong value"), NameError("typo"), ZeroDivisionError()])
def test_wait_for_lets_a_real_failure_through_at_once(error):
    """A failed assertion or a bug in the condition is not slowness: raised at the first call, not
    turned into a TimeoutError after the whole timeout."""
    calls = []

    def condition():
        calls.append(1)
        raise error

    with pytest.raises(type(error)):
        wait_for(condition, 60, "z", interval=0)
    assert len(calls) == 1


def test_the_load_generator_pauses_its_think_time_between_answers_and_retries_429_after_retry_after():
    """A real HTTP server on loopback counts the requests: a client with think time sends about one per
    (request + think), one without sends back to back; a 429 with Retry-After is retried, not lost."""
    import http.server
    import threading
    import time

    from diffusion_dev.loadgen import ClosedLoopLoad

    refused = threading.Event()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - the stdlib's name
            self.rfile.read(int(self.headers["Content-Length"]))
            if not refused.is_set():  # the first request is turned away once
                refused.set()
                self.send_response(429)
                self.send_header("Retry-After", "0")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/images/generations"
    try:
        loads = {}
        for think in (0.2, 0.0):
            loads[think] = load = ClosedLoopLoad(url, clients=1, think=think).start()
            time.sleep(1.0)
            load.stop()
            assert not load.failures, load.failures
        counts = {think: load.counts["200"] for think, load in loads.items()}
        assert loads[0.2].counts["429 retried"] == 1  # the one refusal, retried after its Retry-After
        assert 3 <= counts[0.2] <= 6, counts  # ~1 s / 0.2 s
        assert counts[0.0] > 3 * counts[0.2], counts
    finally:
        server.shutdown()
