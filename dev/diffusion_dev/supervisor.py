"""The background process behind `diffusion-dev up`.

It owns the cluster's processes (they die with it: parent-death signal), writes `state.json` in
the state dir once the cluster is up (or failed, with the reason), and on SIGTERM/SIGINT/SIGHUP
stops every component and removes the cluster's files.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

from .cluster import LocalCluster, find_kubectl


def write_state(directory: Path, /, **fields: object) -> None:
    tmp = directory / "state.json.tmp"
    tmp.write_text(json.dumps(fields, indent=2) + "\n")
    tmp.replace(directory / "state.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="diffusion-dev-supervisor")
    ap.add_argument("--state-dir", type=Path, required=True)
    ap.add_argument("--bin-dir", type=Path, required=True)
    ap.add_argument("--nodes", default=None)
    ap.add_argument("--real-node", type=int, choices=(0, 1), required=True)
    ap.add_argument("--timeout", type=float, default=60)
    args = ap.parse_args(argv)
    state_dir: Path = args.state_dir
    run_dir = state_dir / "run"
    if run_dir.exists():
        shutil.rmtree(run_dir)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stop.set())

    def log(msg: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {msg}", flush=True)

    cluster = LocalCluster(
        nodes=args.nodes,
        bin_dir=args.bin_dir,
        workdir=run_dir,
        timeout=args.timeout,
        progress=log,
        real_node=bool(args.real_node),
    )
    base = {
        "pid": os.getpid(),
        "state_dir": str(state_dir),
        "bin_dir": str(args.bin_dir),
        "nodes": cluster.nodes,
        "real_node": bool(args.real_node),
    }
    try:
        cluster.start()
    except Exception as exc:  # noqa: BLE001 - reported to `dev up` through state.json
        log(f"start failed: {exc}")
        write_state(state_dir, status="failed", error=str(exc), **base)
        cluster.stop()
        return 1
    kubeconfig = state_dir / "kubeconfig"
    shutil.copy2(cluster.kubeconfig, kubeconfig)
    os.chmod(kubeconfig, 0o600)
    write_state(
        state_dir,
        status="running",
        kubeconfig=str(kubeconfig),
        server=cluster.server,
        kubectl=find_kubectl(cluster.bin_dir),
        components={
            n: {"pid": pid, "log": str(cluster.all_components()[n].log)} for n, pid in cluster.pids().items()
        },
        containerd_socket=str(cluster.node.sock) if cluster.node is not None else None,
        timings=cluster.timings,
        prometheus=cluster.monitoring.prometheus_url if cluster.monitoring is not None else None,
        **base,
    )
    log("running; waiting for SIGTERM")
    exited: set[str] = set()
    while not stop.wait(2.0):
        for name, comp in cluster.all_components().items():
            if name not in exited and comp.proc is not None and comp.proc.poll() is not None:
                exited.add(name)
                log(f"component {name} exited with code {comp.proc.returncode}")
    log("stopping")
    cluster.stop()
    shutil.rmtree(run_dir, ignore_errors=True)
    write_state(state_dir, status="stopped", **base)
    log("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
