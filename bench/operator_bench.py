"""Operator benchmark on the local control plane (kwok nodes, real apiserver/controller-manager/scheduler).

Measures, each against a baseline taken in the same run on the same cluster:
  1. CR create -> Deployment exists, p50/p99 over N CRs created one after another;
     baseline: creating the same Deployment directly and seeing it exist (apiserver floor).
  2. time for M CRs created at once to converge (every CR Ready=True, i.e. its pods Ready);
     baseline: M Deployments created directly until all available (controller-manager + scheduler + kwok).
  3. the operator's RSS (current and peak) after converging M CRs.

    .venv/bin/python bench/operator_bench.py                 # starts its own local control plane
    .venv/bin/python bench/operator_bench.py --latency-crs 50 --converge-crs 200
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from diffusion_operator.api.group import API_VERSION as CR_API
from diffusion_operator.api.group import KIND

REPO = Path(__file__).resolve().parents[1]
CRD = REPO / "crds" / "diffusion.dev_diffusiondeployments.yaml"
SAMPLE = REPO / "samples" / "tiny-cpu.yaml"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def cr_body(name: str, namespace: str) -> dict:
    doc = yaml.safe_load(SAMPLE.read_text())
    doc["metadata"] = {"name": name, "namespace": namespace}
    doc["spec"]["template"].pop("resources", None)  # 200 pods on 3 fake CPU nodes
    return doc


def direct_deployment(name: str, namespace: str) -> dict:
    """The Deployment the operator would build, applied by hand (no owner)."""
    from diffusion_operator import builders, validation

    parsed = validation.parse(name, namespace, cr_body(name, namespace)["spec"])
    owner = {"apiVersion": CR_API, "kind": KIND, "metadata": {"name": name, "uid": "none"}}
    dep = builders.build_deployment(parsed.cr, owner, builders.build_configmap(parsed.cr, owner))
    dep["metadata"].pop("ownerReferences")
    return dep


def wait_exists(kube, api: str, kind: str, namespace: str, name: str, timeout: float = 30) -> float:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        if kube.get(api, kind, namespace, name) is not None:
            return time.perf_counter()
        time.sleep(0.005)
    raise TimeoutError(f"{kind} {namespace}/{name} did not appear within {timeout}s")


def create_one(kube, namespace: str, name: str, direct: bool) -> None:
    """POST a DiffusionDeployment, or (the baseline) the Deployment it would become."""
    if direct:
        kube.request(
            "POST",
            kube.collection("apps/v1", "Deployment", namespace),
            body=direct_deployment(name, namespace),
        )
    else:
        kube.request("POST", kube.collection(CR_API, KIND, namespace), body=cr_body(name, namespace))


def latency(kube, namespace: str, count: int, direct: bool) -> list[float]:
    out = []
    for i in range(count):
        name = f"{'direct' if direct else 'lat'}-{i}"
        t0 = time.perf_counter()
        create_one(kube, namespace, name, direct)
        out.append(wait_exists(kube, "apps/v1", "Deployment", namespace, name) - t0)
    return out


def converge(kube, namespace: str, count: int, direct: bool, timeout: float = 600) -> float:
    def create(i: int) -> None:
        create_one(kube, namespace, f"{'dconv' if direct else 'conv'}-{i}", direct)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(count)))
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        if direct:
            items = kube.request("GET", kube.collection("apps/v1", "Deployment", namespace))["items"]
            done = sum(1 for d in items if (d.get("status") or {}).get("availableReplicas", 0) >= 1)
        else:
            items = kube.request("GET", kube.collection(CR_API, KIND, namespace))["items"]
            done = sum(
                1
                for d in items
                if any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in (d.get("status") or {}).get("conditions", [])
                )
            )
        if done >= count:
            return time.perf_counter() - t0
        time.sleep(0.25)
    raise TimeoutError(
        f"{count} {'Deployments' if direct else 'CRs'} not converged within {timeout}s ({done} done)"
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def operator_metrics(port: int) -> dict[str, float]:
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = s.name + "".join(f",{k}={v}" for k, v in sorted(s.labels.items()))
            out[key] = s.value
    return out


def rss_mib(pid: int) -> tuple[float, float]:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-crs", type=int, default=50)
    parser.add_argument("--converge-crs", type=int, default=200)
    parser.add_argument(
        "--nodes", default="h100=2,a100=1,cpu=6", help="kwok node pool (110 pods per node; 500 pods in all)"
    )
    args = parser.parse_args(argv)

    from diffusion_dev import LocalCluster

    work = Path(tempfile.mkdtemp(prefix="operator-bench-"))
    print(f"starting the local control plane ({args.nodes}) ...", flush=True)
    # the operator's own speed: fake pods only (kwok), no real node
    cluster = LocalCluster(nodes=args.nodes, timeout=180, real_node=False).start()
    operator = None
    try:
        os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
        from diffusion_operator.kube import Kube

        kube = Kube()
        cluster.kubectl("apply", "--server-side", "-f", str(CRD))
        cluster.kubectl("wait", "--for=condition=Established", "crd/diffusiondeployments.diffusion.dev")
        for ns in ("bench-lat", "bench-conv", "bench-direct", "bench-dconv"):
            cluster.kubectl("create", "namespace", ns)
        for ns in ("bench-lat", "bench-conv", "bench-direct", "bench-dconv"):
            while cluster.kubectl("get", "sa", "default", "-n", ns, check=False).returncode:
                time.sleep(0.2)
        log = work / "operator.log"
        metrics_port = free_port()
        operator = subprocess.Popen(
            [str(Path(sys.executable).parent / "diffusion-operator"), "run", "-n", "bench-lat", "-n", "bench-conv",
             "--metrics-port", str(metrics_port), "--health-port", "0", "--log-format", "json"],
            env=dict(os.environ), stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        time.sleep(3)
        if operator.poll() is not None:
            print(log.read_text()[-3000:], file=sys.stderr)
            return 1
        rss_idle, _ = rss_mib(operator.pid)

        base = latency(kube, "bench-direct", args.latency_crs, direct=True)
        lat = latency(kube, "bench-lat", args.latency_crs, direct=False)
        print(f"\nCR create -> Deployment exists, {args.latency_crs} CRs one after another")
        print(
            f"  operator : p50 {statistics.median(lat) * 1000:7.1f} ms   p99 {percentile(lat, 99) * 1000:7.1f} ms"
        )
        print(f"  baseline : p50 {statistics.median(base) * 1000:7.1f} ms   p99 {percentile(base, 99) * 1000:7.1f} ms"
              "   (Deployment created directly)")  # fmt: skip
        print(
            f"  ratio    : p50 x{statistics.median(lat) / statistics.median(base):.1f}   target p50 <= 500 ms"
        )

        direct_s = converge(kube, "bench-dconv", args.converge_crs, direct=True)
        op_s = converge(kube, "bench-conv", args.converge_crs, direct=False)
        print(f"\n{args.converge_crs} CRs created at once -> all Ready")
        print(f"  operator : {op_s:7.2f} s")
        print(
            f"  baseline : {direct_s:7.2f} s   ({args.converge_crs} Deployments created directly, all available)"
        )
        print(f"  ratio    : x{op_s / direct_s:.2f}   target <= 60 s")

        m = operator_metrics(metrics_port)
        count = m.get("diffusion_operator_reconcile_duration_seconds_count", 0)
        mean = m.get("diffusion_operator_reconcile_duration_seconds_sum", 0) / max(1, count)
        writes = sum(v for k, v in m.items() if k.startswith("diffusion_operator_api_writes_total"))
        skipped = m.get("diffusion_operator_reconciles_skipped_total", 0)
        crs = args.latency_crs + args.converge_crs
        print(
            f"\noperator: {count:.0f} reconciles for {crs} CRs ({count / crs:.2f} per CR, target <= 3), "
            f"mean {mean * 1000:.1f} ms each; {skipped:.0f} queued runs skipped as echoes; "
            f"{writes:.0f} API writes ({writes / crs:.2f} per CR)"
        )
        rss, peak = rss_mib(operator.pid)
        print(
            f"\noperator RSS: {rss:.0f} MiB now, {peak:.0f} MiB peak, {rss_idle:.0f} MiB before any CR (target <= 250 MB)"
        )
        if operator.poll() is not None:
            print("operator died during the run", file=sys.stderr)
            return 1
        return 0
    except BaseException:
        if operator is not None:
            print(f"operator log: {log}", file=sys.stderr)
        raise
    finally:
        if operator is not None and operator.poll() is None:
            operator.terminate()
            try:
                operator.wait(timeout=15)
            except subprocess.TimeoutExpired:
                operator.kill()
        cluster.stop()


if __name__ == "__main__":
    sys.exit(main())
