"""The launcher itself: real versions, failures named with log tails, no orphan processes."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from diffusion_dev import ComponentError, LocalCluster, wait_for

pytestmark = pytest.mark.cluster


def alive(pid: int) -> bool:
    try:
        state = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_binaries_report_their_real_versions(cluster):
    out = subprocess.run(
        [str(cluster.bin_dir / "kube-apiserver"), "--version"], capture_output=True, text=True
    )
    assert out.stdout.strip() == "Kubernetes v1.37.2"
    server = json.loads(cluster.kubectl("version", "-o", "json").stdout)["serverVersion"]
    assert server["gitVersion"] == "v1.37.2" and server["minor"] == "37"
    etcd = subprocess.run([str(cluster.bin_dir / "etcd"), "--version"], capture_output=True, text=True).stdout
    assert re.search(r"etcd Version: 3\.6\.\d+", etcd), etcd
    helm = cluster.bin_dir / "helm"
    if helm.exists():  # absent only when DIFFUSION_OPERATOR_ASSETS points at envtest-style assets
        assert subprocess.run(
            [str(helm), "version", "--short"], capture_output=True, text=True
        ).stdout.startswith("v3.")


def test_failing_component_is_named_with_its_log_tail(cluster, tmp_path):
    bins = tmp_path / "bin"
    bins.mkdir()
    for name in ("etcd", "kube-controller-manager", "kube-scheduler", "kwok"):
        (bins / name).symlink_to(cluster.bin_dir / name)
    fake = bins / "kube-apiserver"
    fake.write_text("#!/bin/sh\necho 'E0000 boom: cannot serve' >&2\nexit 3\n")
    fake.chmod(0o755)
    broken = LocalCluster(nodes="cpu=1", bin_dir=bins, timeout=30, progress=lambda m: None, real_node=False)
    with pytest.raises(ComponentError) as info:
        broken.start()
    assert info.value.component == "kube-apiserver"
    assert "exited with code 3" in str(info.value) and "boom: cannot serve" in str(info.value)
    # etcd, which had started, was stopped again
    assert broken.components["etcd"].proc.poll() is not None
    assert not broken.workdir.exists()


def _pythonpath() -> str:
    import diffusion_dev

    here = str(Path(diffusion_dev.__file__).resolve().parents[1])
    return os.pathsep.join([here, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


def _dev(state, *args, timeout=240):
    env = dict(os.environ, DIFFUSION_OPERATOR_DEV_STATE=str(state), PYTHONPATH=_pythonpath())
    return subprocess.run(
        [sys.executable, "-m", "diffusion_dev", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def test_cli_up_env_down_leaves_nothing_running(cluster, tmp_path):
    state = tmp_path / "state"
    up = _dev(state, "up", "--nodes", "h100=1,cpu=1", "--no-real-node")
    assert up.returncode == 0, up.stdout + up.stderr
    assert re.search(r"^kubeconfig: .+kubeconfig$", up.stdout, re.M), up.stdout
    assert re.search(r"^binaries: (cached \(built in [\d.]+s|built now in \d+s|prebuilt)", up.stdout, re.M)
    start = re.search(r"^start: ([\d.]+)s \(pki", up.stdout, re.M)
    assert start, up.stdout
    print(f"dev up start time: {start.group(1)}s")
    st = json.loads((state / "state.json").read_text())
    pids = [c["pid"] for c in st["components"].values()] + [st["pid"]]
    assert all(alive(p) for p in pids)

    env_out = _dev(state, "env")
    assert env_out.returncode == 0, env_out.stderr
    script = env_out.stdout + "kubectl get nodes -o name\nhelm version --short 2>/dev/null || true\n"
    shell = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60)
    assert shell.returncode == 0, shell.stderr
    assert sorted(shell.stdout.split()[:2]) == ["node/kwok-cpu-0", "node/kwok-h100-0"], shell.stdout
    assert st["kubeconfig"] in env_out.stdout and shlex.quote(st["bin_dir"]) in env_out.stdout
    assert _dev(state, "status").returncode == 0

    down = _dev(state, "down")
    assert down.returncode == 0 and "stopped" in down.stdout, down.stdout + down.stderr
    assert "leftover" not in down.stdout
    wait_for(lambda: not any(alive(p) for p in pids), 15, "all dev cluster processes to exit")
    assert not (state / "run").exists()
    assert _dev(state, "env").returncode == 1


def test_killed_supervisor_takes_the_whole_cluster_with_it(cluster, tmp_path):
    state = tmp_path / "state"
    up = _dev(state, "up", "--nodes", "cpu=1", "--no-real-node")
    assert up.returncode == 0, up.stdout + up.stderr
    st = json.loads((state / "state.json").read_text())
    pids = {n: c["pid"] for n, c in st["components"].items()}
    assert set(pids) == {"etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"}
    os.kill(st["pid"], signal.SIGKILL)  # a crash: no cleanup code runs in the supervisor
    t = time.monotonic()
    wait_for(lambda: not any(alive(p) for p in pids.values()), 15, f"orphans to die: {pids}")
    print(f"components gone {time.monotonic() - t:.2f}s after SIGKILL of the supervisor")
    down = _dev(state, "down")
    assert down.returncode == 0


def test_bad_node_pool_is_refused_before_anything_starts(tmp_path):
    out = _dev(tmp_path / "state", "up", "--nodes", "h100=two")
    assert out.returncode == 1
    assert "bad node pool entry 'h100=two'" in out.stderr
    assert not (tmp_path / "state" / "state.json").exists()


def test_port_taken_between_pick_and_bind_is_retried(cluster, monkeypatch):
    import socket

    from diffusion_dev import cluster as cluster_module

    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    taken = busy.getsockname()[1]
    picks = iter([taken])
    real = cluster_module.free_port
    monkeypatch.setattr(cluster_module, "free_port", lambda: next(picks, None) or real())
    messages: list[str] = []
    local = LocalCluster(
        nodes="cpu=1", bin_dir=cluster.bin_dir, timeout=60, progress=messages.append, real_node=False
    )
    try:
        local.start()
        assert local.ports["etcd"] != taken
        assert any("etcd: port taken meanwhile" in m for m in messages), messages
        assert local.kubectl("get", "nodes", "-o", "name").stdout.split() == ["node/kwok-cpu-0"]
    finally:
        local.stop()
        busy.close()


def test_second_build_builds_nothing(cluster):
    from diffusion_dev.build import assets_override, build, ensure_binaries

    messages: list[str] = []
    override = assets_override()
    if override is not None:  # prebuilt binaries named by the environment are used as they are
        assert ensure_binaries(progress=messages.append) == override == cluster.bin_dir
    else:
        bin_dir, manifest = build(progress=messages.append)
        assert bin_dir == cluster.bin_dir
        assert manifest["versions"] == {
            "k8s": "v1.37.2",
            "etcd": "v3.6.16",
            "kwok": "v0.8.0",
            "helm": "v3.22.0",
            "containerd": "v2.4.2",
            "crictl": "v1.37.0",
            "prometheus": "v0.316.0",
            "prometheus-adapter": "v0.12.0",
        }
    assert messages == []  # no go invocation, no progress lines
