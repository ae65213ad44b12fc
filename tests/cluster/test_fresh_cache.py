"""A fresh machine's project cache: every folder the tooling uses is made by the code that uses it.

`DIFFUSION_OPERATOR_CACHE` points the project cache at an empty folder while the Go, pip and Go
module caches stay warm, and the parts of the bootstrap and the demo that create state run against
it for real: the base image (mmdebstrap, then buildah's storage and temporary folders), the tiny
model's folder, and the real node (its run folders, containerd root, pause image and host baseline).
On main at 869adbe the first of these failed as a fresh machine did: buildah's `tmp` folder was
used as a parent before anything made it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from diffusion_dev import hosttools
from diffusion_dev.build import CACHE_ENV, cache_home

REPO = Path(__file__).resolve().parents[2]


def _env(cache: Path) -> dict[str, str]:
    pythonpath = os.pathsep.join([str(REPO / "dev"), str(REPO / "runtime"), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, **{CACHE_ENV: str(cache)}, PYTHONPATH=pythonpath)


def _python(cache: Path, code: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", code], env=_env(cache), capture_output=True, text=True, timeout=timeout
    )


def test_the_cache_folder_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "elsewhere"))
    assert cache_home() == tmp_path / "elsewhere"
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_home() == tmp_path / "xdg" / "diffusion-operator"


def test_the_base_image_builds_into_an_empty_project_cache(tmp_path):
    # buildah and mmdebstrap are installed by the bootstrap as root; missing ones fail here naming their
    # Debian package (never a skip: the image path is the core of a fresh machine)
    hosttools.require("images")
    cache = tmp_path / "cache"
    assert not cache.exists()
    try:
        proc = _python(cache, "from diffusion_dev import images; print(images.ensure_base()[0])", 1800)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        ref = proc.stdout.strip().splitlines()[-1]
        assert "[images] base built in" in proc.stderr, proc.stderr[-2000:]
        # the image is in the new cache's storage, and a second call finds it there
        again = _python(
            cache,
            f"from diffusion_dev import images; assert images.image_exists({ref!r}); print(images.ensure_base()[1])",
            120,
        )
        assert again.returncode == 0, again.stderr[-2000:]
        assert float(again.stdout.strip()) == 0.0  # cached: nothing built
        assert (cache / "buildah" / "storage").is_dir() and (cache / "buildah" / "tmp").is_dir()
        assert list((cache / "buildah" / "tmp").iterdir()) == []  # its temporary folders are gone
    finally:
        if cache.exists():
            _python(cache, "from diffusion_dev import images; images.buildah('rmi', '--all', '--force')", 300)
            shutil.rmtree(cache, ignore_errors=True)


def test_the_tiny_model_folder_is_made_in_an_empty_project_cache(tmp_path):
    cache = tmp_path / "cache"
    proc = _python(
        cache, "from diffusion_dev.workloads import tiny_model_root; print(tiny_model_root())", 900
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    root = Path(proc.stdout.strip().splitlines()[-1])
    assert root.parent == cache / "models"
    assert (root / "tiny-flux" / "model_index.json").is_file()
    assert not list((cache / "models").glob("*.partial"))


def test_the_real_node_starts_with_an_empty_project_cache(cluster, node, tmp_path, monkeypatch):
    """The session's node makes way; a node whose project cache is empty starts, runs the pause
    image it builds into its own containerd root, and stops leaving the host as found; then the
    session's node comes back."""
    cache = tmp_path / "cache"
    cluster.stop_node()
    try:
        monkeypatch.setenv(CACHE_ENV, str(cache))
        fresh = cluster.start_node()
        assert fresh.containerd_root == cache / "node" / "containerd"
        assert fresh.containerd_root.is_dir()
        assert fresh.pause_ref in fresh.images()
        ready = cluster.kubectl(
            "get",
            "node",
            "diffusion-dev-node",
            "-o",
            "jsonpath={.status.conditions[?(@.type=='Ready')].status}",
        )
        assert ready.stdout.strip() == "True"
        stopped = cluster.stop_node()
        assert stopped.leftovers == [], stopped.leftovers
    finally:
        monkeypatch.delenv(CACHE_ENV)
        if cluster.node is not None:  # a failure above left the fresh node running
            cluster.stop_node()
        cluster.start_node()
        shutil.rmtree(cache, ignore_errors=True)
