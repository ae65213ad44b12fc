"""Operator benchmark on the local control plane (kwok nodes, real apiserver/controller-manager/scheduler).

Measures, each against a baseline (the floor: the control plane alone) taken in the same run on the
same cluster, baseline and operator interleaved (ABAB..., the order swapping every round), medians
with their spread (p10-p90, min-max) and every sample in the JSON (--out):
  1. CR create -> Deployment exists over N CRs created one after another, a CR and a Deployment in
     turn; baseline: creating the same Deployment directly and seeing it exist (apiserver floor).
  2. M CRs created at once until every CR's Deployment has its pod Ready (readyReplicas >= 1), and
     until every CR reports Ready=True; baseline: M Deployments created directly until each has its
     pod Ready: Ready vs Ready, the same criterion on the same kind of object. `--rounds` rounds,
     each floor and each operator measurement starting on an idle cluster: the previous
     measurement's objects deleted and their pods gone.
  3. reconciles and API writes per CR (the operator's metrics, over the create phases only) and the
     operator's RSS (current and peak) after the last round.

    .venv/bin/python bench/operator_bench.py --out bench/results/operator_bench_kwok.json
    .venv/bin/python bench/operator_bench.py --latency-crs 50 --converge-crs 200 --rounds 3
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
from _common import run_record, spread, write_result
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


def latency_pairs(kube, count: int) -> tuple[list[float], list[float]]:
    """`count` CR creations (bench-lat) and `count` direct Deployment creations (bench-direct), one
    after another in turn, the order swapping each pair: (operator samples, baseline samples)."""
    op: list[float] = []
    base: list[float] = []
    for i in range(count):
        order = (False, True) if i % 2 == 0 else (True, False)
        for direct in order:
            namespace, name = ("bench-direct", f"direct-{i}") if direct else ("bench-lat", f"lat-{i}")
            t0 = time.perf_counter()
            create_one(kube, namespace, name, direct)
            (base if direct else op).append(wait_exists(kube, "apps/v1", "Deployment", namespace, name) - t0)
    return op, base


def pod_ready_deployments(kube, namespace: str) -> int:
    items = kube.request("GET", kube.collection("apps/v1", "Deployment", namespace))["items"]
    return sum(1 for d in items if (d.get("status") or {}).get("readyReplicas", 0) >= 1)


def ready_crs(kube, namespace: str) -> int:
    items = kube.request("GET", kube.collection(CR_API, KIND, namespace))["items"]
    return sum(
        1
        for d in items
        if any(
            c["type"] == "Ready" and c["status"] == "True"
            for c in (d.get("status") or {}).get("conditions", [])
        )
    )


def converge(kube, namespace: str, count: int, direct: bool, round_: int, timeout: float = 600) -> dict:
    """Create `count` CRs (or, direct, the Deployments they become) at once, 8 client threads; seconds
    until every Deployment has its pod Ready and, for CRs, until every CR reports Ready=True."""

    def create(i: int) -> None:
        create_one(kube, namespace, f"{'dconv' if direct else 'conv'}-{round_}-{i}", direct)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(create, range(count)))
    out: dict[str, float] = {}
    pods, crs = 0, 0
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        if "pods_ready_s" not in out:
            pods = pod_ready_deployments(kube, namespace)
            if pods >= count:
                out["pods_ready_s"] = time.perf_counter() - t0
        if not direct and "cr_ready_s" not in out:
            crs = ready_crs(kube, namespace)
            if crs >= count:
                out["cr_ready_s"] = time.perf_counter() - t0
        if len(out) == (1 if direct else 2):
            return out
        time.sleep(0.25)
    raise TimeoutError(f"{count} {'Deployments' if direct else 'CRs'} not converged within {timeout}s "
                       f"({pods} with a Ready pod, {crs} CRs Ready)")  # fmt: skip


def make_idle(cluster, kube, namespace: str, direct: bool, timeout: float = 600) -> float:
    """Delete what the last measurement in `namespace` created (CRs: their children go by owner
    reference) and wait until no Deployment and no pod is left: the next measurement starts on an
    idle cluster. Returns the seconds it took."""
    t0 = time.perf_counter()
    cluster.kubectl("delete", "deployments" if direct else "diffusiondeployments", "--all", "-n", namespace,
                    "--wait=false", timeout=300)  # fmt: skip
    deadline = t0 + timeout
    while time.perf_counter() < deadline:
        left = sum(
            len(kube.request("GET", kube.collection(api, kind, namespace))["items"])
            for api, kind in (("apps/v1", "Deployment"), ("v1", "Pod"), (CR_API, KIND))
        )
        if left == 0:
            return time.perf_counter() - t0
        time.sleep(0.5)
    raise TimeoutError(f"{namespace} not idle within {timeout}s")


def reconcile_counters(port: int) -> dict[str, float]:
    m = operator_metrics(port)
    return {
        "reconciles": m.get("diffusion_operator_reconcile_duration_seconds_count", 0),
        "reconcile_seconds": m.get("diffusion_operator_reconcile_duration_seconds_sum", 0),
        "skipped": m.get("diffusion_operator_reconciles_skipped_total", 0),
        "writes": sum(v for k, v in m.items() if k.startswith("diffusion_operator_api_writes_total")),
    }


def add_delta(total: dict[str, float], before: dict[str, float], after: dict[str, float]) -> None:
    for k in after:
        total[k] = total.get(k, 0) + after[k] - before[k]


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
    parser.add_argument("--rounds", type=int, default=3, help="converge rounds (floor + operator each)")
    parser.add_argument(
        "--nodes",
        default="h100=2,a100=1,cpu=6",
        help="kwok node pool (110 pods per node; one measurement's pods at a time)",
    )
    parser.add_argument("--out", help="write the figures and every sample as JSON here")
    args = parser.parse_args(argv)
    record = run_record("operator_bench.py", sys.argv[1:] if argv is None else argv, ("kopf",))

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

        ms = 1000.0
        counters: dict[str, float] = {}
        before = reconcile_counters(metrics_port)
        lat, base = latency_pairs(kube, args.latency_crs)
        add_delta(counters, before, reconcile_counters(metrics_port))
        lat_ratio = statistics.median(lat) / statistics.median(base)
        print(f"\nCR create -> Deployment exists, {args.latency_crs} CRs and Deployments in turn (ABAB...)")
        for label, xs in (("operator", lat), ("baseline", base)):
            print(f"  {label} : p50 {statistics.median(xs) * ms:7.1f} ms   p90 {percentile(xs, 90) * ms:7.1f} ms   "
                  f"p99 {percentile(xs, 99) * ms:7.1f} ms")  # fmt: skip
        print(f"  ratio    : p50 x{lat_ratio:.2f}   target p50 <= 500 ms")
        for namespace, direct in (("bench-lat", False), ("bench-direct", True)):
            make_idle(cluster, kube, namespace, direct)  # the converge rounds start on an idle cluster

        rounds = []
        for r in range(args.rounds):
            row: dict = {"round": r, "order": "floor, operator" if r % 2 == 0 else "operator, floor"}
            for direct in (True, False) if r % 2 == 0 else (False, True):
                namespace = "bench-dconv" if direct else "bench-conv"
                row["idle_load_before_" + ("floor" if direct else "operator")] = [
                    round(x, 2) for x in os.getloadavg()
                ]
                if direct:
                    row["floor"] = converge(kube, namespace, args.converge_crs, True, r)
                else:
                    before = reconcile_counters(metrics_port)
                    row["operator"] = converge(kube, namespace, args.converge_crs, False, r)
                    add_delta(counters, before, reconcile_counters(metrics_port))
                rss, peak = rss_mib(operator.pid)
                row.setdefault("operator_rss_mib", []).append(round(rss, 1))
                row["cleanup_s_" + ("floor" if direct else "operator")] = round(
                    make_idle(cluster, kube, namespace, direct), 2
                )
            row["ratio_pods_ready"] = row["operator"]["pods_ready_s"] / row["floor"]["pods_ready_s"]
            print(f"round {r} ({row['order']}): floor {row['floor']['pods_ready_s']:.2f} s, operator pods Ready "
                  f"{row['operator']['pods_ready_s']:.2f} s (x{row['ratio_pods_ready']:.2f}), CRs Ready "
                  f"{row['operator']['cr_ready_s']:.2f} s", flush=True)  # fmt: skip
            rounds.append(row)
        floor = [r["floor"]["pods_ready_s"] for r in rounds]
        op_pods = [r["operator"]["pods_ready_s"] for r in rounds]
        op_crs = [r["operator"]["cr_ready_s"] for r in rounds]
        ratios = [r["ratio_pods_ready"] for r in rounds]
        print(
            f"\n{args.converge_crs} created at once, {args.rounds} rounds, each on an idle cluster: median (min-max)"
        )
        for label, xs in (("floor, Deployments' pods Ready", floor), ("operator, CRs' pods Ready", op_pods),
                          ("operator, CRs Ready=True", op_crs)):  # fmt: skip
            print(f"  {label:32s}: {statistics.median(xs):7.2f} s ({min(xs):.2f}-{max(xs):.2f})")
        print(
            f"  ratio pods Ready vs floor, per round: median x{statistics.median(ratios):.2f}   target <= 60 s"
        )

        crs = args.latency_crs + args.converge_crs * args.rounds
        per_cr = counters["reconciles"] / crs
        print(
            f"\noperator: {counters['reconciles']:.0f} reconciles for {crs} CRs ({per_cr:.2f} per CR, target <= 3), "
            f"mean {counters['reconcile_seconds'] / max(1, counters['reconciles']) * ms:.1f} ms each; "
            f"{counters['skipped']:.0f} queued runs skipped as echoes; "
            f"{counters['writes']:.0f} API writes ({counters['writes'] / crs:.2f} per CR)"
        )
        rss, peak = rss_mib(operator.pid)
        print(
            f"\noperator RSS: {rss:.0f} MiB now, {peak:.0f} MiB peak, {rss_idle:.0f} MiB before any CR (target <= 250 MB)"
        )
        if operator.poll() is not None:
            print("operator died during the run", file=sys.stderr)
            return 1
        if args.out:
            write_result(args.out, {
                **record,
                "nodes": args.nodes, "latency_crs": args.latency_crs, "converge_crs": args.converge_crs,
                "rounds": args.rounds,
                "create_to_deployment_ms": {"operator": spread(lat, ms), "floor": spread(base, ms),
                                            "ratio_of_medians": round(lat_ratio, 3)},
                "converge_s": {"floor_pods_ready": spread(floor), "operator_pods_ready": spread(op_pods),
                               "operator_crs_ready": spread(op_crs), "ratio_pods_ready": spread(ratios)},
                "reconciles": {**{k: round(v, 3) for k, v in counters.items()}, "crs": crs,
                               "reconciles_per_cr": round(per_cr, 3), "writes_per_cr": round(counters["writes"] / crs, 3)},
                "operator_rss_mib": {"idle": round(rss_idle, 1), "end": round(rss, 1), "peak": round(peak, 1)},
                "samples": {"create_to_deployment_s": {"operator": lat, "floor": base}, "converge_rounds": rounds},
            })  # fmt: skip
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
