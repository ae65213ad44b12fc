"""Operator restart speed on the local control plane (kwok nodes; issue 22): SIGKILL of the leading
operator while 50 CRs are being created, then

  restart:  the same instance started again (same identity: it takes its own Lease back at once);
            seconds from the new process's start to the 50th CR Ready=True;
  takeover: a standby already running (another identity) waits the Lease out (`lease_wait_s`, from
            the kill), then leads; seconds from the moment it holds the Lease to the 50th CR Ready.

Each sample runs in a fresh namespace of one local cluster; the scenario is the cluster test's
(tests/operator/restart_scenario.py). The machine's load average is recorded with every sample.

    DIFFUSION_DEV_REAL_NODE=0 .venv/bin/python bench/operator_restart.py --samples 3 \
        --out bench/results/operator_restart_kwok.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "dev"), str(REPO / "tests" / "operator")]

CRD = REPO / "crds" / "diffusion.dev_diffusiondeployments.yaml"


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def settle(cluster, namespace: str) -> None:
    """Delete a sample's namespace and wait until it is gone: the garbage collection of 50 CRs' children
    and pods must not run during the next sample."""
    cluster.kubectl("delete", "namespace", namespace, "--wait=true", "--timeout=180s")


def control_plane_floor(kubeconfig: Path, namespace: str, count: int) -> float:
    """Seconds for the `count` Deployments the operator would build, created directly (4 threads, as
    the CRs are), to be all available: the controller-manager, scheduler and kwok alone, no operator."""
    from concurrent.futures import ThreadPoolExecutor

    from diffusion_dev import wait_for
    from diffusion_operator import builders, validation
    from restart_scenario import api, crs

    kube = api(kubeconfig)
    deployments = []
    for doc in crs(count):
        name = doc["metadata"]["name"]
        doc["metadata"].update(namespace=namespace, uid=f"none-{name}", generation=1)
        parsed = validation.parse(name, namespace, doc["spec"])
        assert parsed.cr is not None
        children = builders.build_all(parsed.cr, doc, model_cache_ready=True, keda_prometheus_address="")
        deployment = next(o for o in children if o["kind"] == "Deployment")
        deployment["metadata"].pop("ownerReferences", None)
        deployments.append(deployment)
    path = kube.collection("apps/v1", "Deployment", namespace)
    started = time.time()
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda d: kube.request("POST", path, body=d), deployments))

    def available():
        items = kube.list("apps/v1", "Deployment", namespace)
        return all(
            (d.get("status") or {}).get("availableReplicas", 0) >= d["spec"].get("replicas", 1) for d in items
        )

    wait_for(available, 180, f"{count} Deployments available", interval=0.1)
    return round(time.time() - started, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3, help="runs of each scenario")
    parser.add_argument("--crs", type=int, default=50)
    parser.add_argument("--scenario", choices=("restart", "takeover", "both"), default="both")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--logs", type=Path, default=None, help="keep the operators' logs here")
    args = parser.parse_args(argv)

    from diffusion_dev import LocalCluster
    from restart_scenario import sigkill_during_creation

    cluster = LocalCluster(timeout=180, real_node=False).start()
    samples = []
    try:
        cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(CRD))
        deadline = time.monotonic() + 60  # served a moment after it is stored
        while cluster.kubectl("get", "dd", "-A", check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise SystemExit("diffusiondeployments not served 60 s after the CRD was applied")
            time.sleep(0.5)
        modes = {"restart": [False], "takeover": [True], "both": [False, True]}[args.scenario]
        for _ in range(args.samples):
            for takeover in modes:
                namespace = f"restart-{uuid.uuid4().hex[:6]}"
                cluster.kubectl("create", "namespace", namespace)
                load_before = loadavg()
                with tempfile.TemporaryDirectory() as tmp:
                    work = Path(tmp) if args.logs is None else args.logs / namespace
                    work.mkdir(parents=True, exist_ok=True)
                    record = sigkill_during_creation(
                        cluster.kubeconfig, namespace, work, takeover, count=args.crs
                    )
                record.pop("log", None)
                names = record.pop("names")
                children = record.pop("children")
                record["one_child_of_each_kind_per_cr"] = all(v == names for v in children.values())
                record["load_before"], record["load_after"] = load_before, loadavg()
                print(json.dumps(record), flush=True)
                samples.append(record)
                settle(cluster, namespace)
            # the floor, in the same round: what the control plane alone takes for as many Deployments
            namespace = f"floor-{uuid.uuid4().hex[:6]}"
            cluster.kubectl("create", "namespace", namespace)
            load_before = loadavg()
            floor = {
                "scenario": "control-plane floor",
                "crs": args.crs,
                "all_available_s": control_plane_floor(cluster.kubeconfig, namespace, args.crs),
                "load_before": load_before,
                "load_after": loadavg(),
            }
            print(json.dumps(floor), flush=True)
            samples.append(floor)
            settle(cluster, namespace)
    finally:
        cluster.stop()
    out: dict = {
        "command": "DIFFUSION_DEV_REAL_NODE=0 .venv/bin/python bench/operator_restart.py "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "note": "the helpers' shared 2-core machine; load averages per sample (other sessions' tests)",
        },
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "bound_s": 15.0,
        "samples": samples,
    }
    for name in ("same-identity restart", "standby takeover", "control-plane floor"):
        times = [s.get("restart_s", s.get("all_available_s")) for s in samples if s["scenario"] == name]
        if times:
            out.setdefault("summary", {})[name] = {"max_s": max(times), "min_s": min(times), "n": len(times)}
    text = json.dumps(out, indent=2)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
